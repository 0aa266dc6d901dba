"""The backbone table's contract, checked for every entry: builds tiny, encodes a real photo,
reports widths that match its output, fingerprints stably; and the feature-table derivations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage import data

from helpers.family_factory import TINY
from samprobe.backbones import registry
from samprobe.backbones.registry import PooledFeature, fingerprint, resolve_feature
from samprobe.config import BackboneConfig
from samprobe.errors import ConfigError


def test_every_entry_has_a_tiny_checkpoint_and_loads():
    assert set(TINY) == set(registry.available())
    for entry in registry.BACKBONES.values():
        assert callable(entry.load_builder()) and issubclass(entry.load_class(), registry.Backbone)
        assert entry.preprocessing and entry.summary


# sam2's official checkpoint is built by the reference package in a subprocess (~9 s): full suite only
@pytest.fixture(
    scope="module",
    params=[pytest.param(n, marks=pytest.mark.slow) if n == "sam2" else n for n in sorted(TINY)],
)
def built(request, tmp_path_factory):
    cfg = BackboneConfig(**TINY[request.param](tmp_path_factory.mktemp(request.param)))
    return cfg, registry.build_backbone(cfg)


def _photo_batch(bb):
    prepared = [bb.prepare(img) for img in (data.chelsea(), data.astronaut())]
    return torch.stack([p[0] for p in prepared]), torch.tensor([p[1] for p in prepared])


@pytest.mark.slow
def test_contract_encodes_a_real_photo_with_the_declared_widths(built):
    cfg, bb = built
    assert isinstance(bb, registry.BACKBONES[cfg.name].load_class())
    x, valid = _photo_batch(bb)
    assert x.dtype == torch.uint8 and x.shape[1:] == (3, bb.input_size, bb.input_size)
    table = bb.features()
    assert set(bb.default_pooling) <= set(table) and bb.feature_names == tuple(table)
    for name, feat in table.items():
        out = bb.encode(x, valid, [name])
        assert out.shape == (2, feat.width) == (2, bb.feature_dims()[name]), name
        assert torch.isfinite(out).all() and out.std() > 0, name
    every = list(table)
    assert bb.encode(x, valid, every).shape == (2, bb.pooled_dim(every))
    # the two photos differ, so must their features
    assert not torch.allclose(*bb.encode(x, valid, list(bb.default_pooling)))


def test_contract_fingerprint_is_stable_across_builds(built):
    cfg, bb = built
    again = registry.build_backbone(cfg)
    pooling = list(bb.default_pooling)
    assert fingerprint(bb, pooling, "float16", "fp32") == fingerprint(
        again, pooling, "float16", "fp32"
    )
    assert fingerprint(bb, pooling, "float16", "fp32") != fingerprint(
        bb, pooling, "float32", "fp32"
    )


def test_layered_feature_names_resolve_to_their_layers():
    table = {
        "neck_avg": PooledFeature("neck", "avg", 256),
        "block_avg": PooledFeature("block", "avg", 768, layer_widths=(768,) * 11 + (1024,)),
    }
    r = resolve_feature(table, "block_avg@6,12", "sam")
    assert r.sources == ("block@6", "block@12") and r.width == 768 + 1024 and r.pool == "avg"
    assert resolve_feature(table, "neck_avg", "sam").sources == ("neck",)
    for bad, why in (
        ("block_avg@0", "from 1 to 12"),
        ("block_avg@13", "from 1 to 12"),
        ("block_avg@3,3", "distinct"),
        ("neck_avg@2", "not offered"),
        ("pixels", "not offered"),
    ):
        with pytest.raises(ConfigError, match=why):
            resolve_feature(table, bad, "sam")


def test_sources_tell_what_a_forward_must_compute(built):
    cfg, bb = built
    for name, feat in bb.features().items():
        assert bb.sources([name]) == {feat.source}
    with pytest.raises(ConfigError, match="choose from"):
        bb.check_pooling([])
    np.testing.assert_equal(bb.pooled_dim(list(bb.feature_names)), sum(bb.feature_dims().values()))
