import samprobe.cli

raise SystemExit(samprobe.cli.main())
