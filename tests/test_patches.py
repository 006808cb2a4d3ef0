"""Local models (``model.context: local``): patch training and tiled sampling (issue 25, item 2)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from precip_cvae import checkpoint, train
from precip_cvae.config import ConfigError, LossConfig, ModelConfig
from precip_cvae.data import Batch, PatchSampler
from precip_cvae.model import CVAE, Window
from precip_cvae.transform import TargetTransform
from test_train import _cfg as train_cfg, _paths

LOCAL = ModelConfig(preset="tiny", context="local", context_cells=8)
FIELD = (128, 136)  # four tiles of 64 x 72, each with a margin of the receptive radius (40 cells) inside it


def _local_model(output="field", **kw) -> CVAE:
    torch.manual_seed(0)
    cfg = ModelConfig(preset="tiny", context="local", context_cells=8, **kw)
    model = CVAE(cfg, 3, FIELD, (5, 7), n_static=2, output=output, transform=TargetTransform()).eval()
    model.set_static(torch.randn(2, *FIELD, generator=torch.Generator().manual_seed(1)))
    if model.geographic:  # a predictor grid a little larger than the target's
        gy, gx = torch.meshgrid(torch.linspace(-0.9, 0.9, FIELD[0]), torch.linspace(-1, 1, FIELD[1]), indexing="ij")
        model.set_condition_grid(torch.stack([gx, gy], dim=-1))
    return model


def _inputs():
    g = torch.Generator().manual_seed(2)
    return torch.randn(2, 3, 5, 7, generator=g), torch.rand(2, 1, *FIELD, generator=g) > 0.2


@pytest.mark.parametrize("output, kw", [
    ("field", {}),
    ("field", {"noise_channels": 2, "residual": True}),
    ("bernoulli_gamma", {"latent_level": 2}),
    ("field", {"prior": "standard", "condition_interpolation": "geographic"}),
    ("field", {"decoder_blocks": 2}),
])
def test_tiled_sampling_gives_the_whole_field_s_members(output, kw):
    model = _local_model(output, **kw)
    y, valid = _inputs()
    with torch.no_grad():
        whole = model.sample(y, valid, 2, generator=torch.Generator().manual_seed(3))
        tiled = model.sample(y, valid, 2, generator=torch.Generator().manual_seed(3), tile=(64, 72))
    assert tiled.shape == whole.shape == (2, 2, 1, *FIELD)
    assert float(whole.std()) > 0.01
    torch.testing.assert_close(tiled, whole, rtol=0, atol=1e-4)


def test_the_margin_is_what_makes_tiles_equal_the_whole_field(monkeypatch):
    """With a margin of one coarsest cell, tiles see their own edges: the fields differ (so the test above can
    fail, and the receptive radius is needed)."""
    model = _local_model()
    y, valid = _inputs()
    with torch.no_grad():
        whole = model.sample(y, valid, 1, generator=torch.Generator().manual_seed(3))
        monkeypatch.setattr(CVAE, "receptive_radius", lambda self: 4)
        tiled = model.sample(y, valid, 1, generator=torch.Generator().manual_seed(3), tile=(64, 72))
    assert float((tiled - whole).abs().max()) > 1e-3


def test_the_decoder_blocks_widen_the_margin_tiles_need(monkeypatch):
    """model.decoder_blocks: two more 3x3 convolutions per block and scale reach further. The bound grows (40 -> 52
    cells for two blocks in the tiny model), and a margin of 24 cells, enough for the tiny model without blocks
    (its bound of 40 is loose), leaves the deeper model's tiles different from its whole field."""
    assert _local_model().receptive_radius() == 40 and _local_model(decoder_blocks=2).receptive_radius() == 52
    y, valid = _inputs()
    monkeypatch.setattr(CVAE, "receptive_radius", lambda self: 24)
    gap = {}
    for n in (0, 2):
        model = _local_model(decoder_blocks=n)
        with torch.no_grad():
            whole = model.sample(y, valid, 1, generator=torch.Generator().manual_seed(3))
            tiled = model.sample(y, valid, 1, generator=torch.Generator().manual_seed(3), tile=(64, 72))
        gap[n] = float((tiled - whole).abs().max())
    assert gap[0] < 1e-4 and gap[2] > 1e-3


def test_a_window_is_encoded_as_the_field_s_own_cells_away_from_its_edges():
    model = _local_model()
    y, _ = _inputs()
    window = Window(torch.tensor([0, 64]), torch.tensor([8, 48]), (64, 72))
    with torch.no_grad():
        whole, part = model.encode_condition(y), model.encode_condition(y, window)
    assert part.vector.shape == (2, model.d_y, 16, 18)  # a vector per cell of the coarsest scale
    r = model.receptive_radius()
    for s in range(model.depth + 1):
        a, f = r >> s, 2**s
        inner = (..., slice(a, 64 // f - a), slice(a, 72 // f - a))
        torch.testing.assert_close(part.maps[s][inner], window.scaled(s).crop(whole.maps[s])[inner], rtol=0, atol=1e-5)


def test_tiles_are_chosen_from_the_memory_budget():
    model = _local_model()
    assert model.tile_for(2, 1e12) is None  # the whole field fits
    th, tw = model.tile_for(64, 2e8)
    assert th == tw and th % 4 == 0 and 4 <= th < FIELD[0]
    assert CVAE(ModelConfig(preset="tiny"), 3, FIELD, (5, 7)).tile_for(64, 1.0) is None  # a global model: whole


def test_windows_need_a_local_model_and_the_model_lattice():
    y, _ = _inputs()
    glob = CVAE(ModelConfig(preset="tiny"), 3, FIELD, (5, 7))
    with pytest.raises(ValueError, match="context 'local'"):
        glob.encode_condition(y, Window.fixed(0, 0, (32, 32), 2))
    model = _local_model()
    x, valid = torch.zeros(2, 1, 32, 32), torch.ones(2, 1, 32, 32, dtype=torch.bool)
    with pytest.raises(ValueError, match="multiples of 4"):
        model(x, y, valid, window=Window.fixed(2, 0, (32, 32), 2))
    with pytest.raises(ValueError, match="inside"):
        model(x, y, valid, window=Window.fixed(120, 0, (32, 32), 2))
    with pytest.raises(ValueError, match="latent 'map' and model.conditioning 'fine'"):
        CVAE(ModelConfig(preset="tiny", context="local", latent="vector"), 3, FIELD, (5, 7))


def test_patches_lie_on_the_lattice_inside_the_grid_where_the_data_are():
    region = np.zeros((12, 16), dtype=bool)
    region[:, :6] = True  # land on the first 6 columns
    sampler = PatchSampler(region, (4, 8), 4, min_valid=0.5)
    # corners at rows 0, 4, 8 and columns 0, 4, 8: the land fraction is 6/8 at column 0, 2/8 at 4, 0 at 8
    assert sorted(map(tuple, sampler.offsets.tolist())) == [(0, 0), (4, 0), (8, 0)]
    assert len(PatchSampler(region, (4, 8), 4, min_valid=0.25)) == 6
    window = sampler.draw(500, torch.Generator().manual_seed(0))
    assert window.size == (4, 8) and set(window.left.tolist()) == {0} and set(window.top.tolist()) == {0, 4, 8}
    counts = np.bincount(window.top.numpy() // 4)
    assert counts.min() > 130  # each of the three places about a third of the time
    with pytest.raises(ValueError, match=r"best 75%"):
        PatchSampler(region, (4, 8), 4, min_valid=0.9)
    with pytest.raises(ValueError, match="multiples of 2\\*\\*depth = 4"):
        PatchSampler(region, (6, 8), 4, min_valid=0.5)


def test_a_cropped_batch_holds_each_sample_s_own_patch():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 1, 12, 16, generator=g)
    thr = torch.rand(1, 1, 12, 16, generator=g)
    batch = Batch(x, x > 0.1, torch.randn(3, 2, 3, 4, generator=g), torch.rand(3, 3, 4), thr, thr + 1)
    sampler = PatchSampler(np.ones((12, 16), dtype=bool), (4, 8), 4, min_valid=1.0)
    cut = sampler.crop(batch, torch.Generator().manual_seed(5))
    assert cut.x.shape == (3, 1, 4, 8) and cut.coarse_mm is None and cut.y is batch.y
    for b in range(3):
        t, l = int(cut.window.top[b]), int(cut.window.left[b])
        assert torch.equal(cut.x[b], x[b, :, t:t + 4, l:l + 8])
        assert torch.equal(cut.valid[b], batch.valid[b, :, t:t + 4, l:l + 8])
        assert torch.equal(cut.thr_x[b], thr[0, :, t:t + 4, l:l + 8])
        assert torch.equal(cut.tail_x[b], thr[0, :, t:t + 4, l:l + 8] + 1)


def _cfg(**kw):
    return train_cfg(**{"epochs": 2, "loss": LossConfig(warmup_epochs=0), **kw})


def test_a_model_trained_on_patches_samples_whole_fields(prepared, tmp_path, caplog):
    caplog.set_level("INFO", logger="precip_cvae.train")
    train.run(_paths(prepared, tmp_path), LOCAL, _cfg(patch_size=(8, 8)))
    assert "patches of [8, 8] cells" in caplog.text
    log = pd.read_csv(tmp_path / "train" / "train_log.csv")
    assert len(log) == 2 and np.isfinite(log["val_CRPS"]).all() and np.isfinite(log["train_loss"]).all()
    model, _ = checkpoint.load_model(tmp_path / "train" / "best.pt")
    assert model.local and model.fine_shape == (16, 16)
    out = model.sample(torch.zeros(2, 3, 4, 4), n_samples=2, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 2, 1, 16, 16) and (out >= 0).all()


def test_patches_need_a_local_model(prepared, tmp_path):
    with pytest.raises(ConfigError, match="needs model.context 'local'"):
        train.run(_paths(prepared, tmp_path), ModelConfig(preset="tiny"), _cfg(patch_size=(8, 8)))


def test_validation_batches_shrink_to_the_memory_budget_on_large_grids():
    tiny = CVAE(ModelConfig(preset="tiny"), 3, (472, 712), (25, 37))
    # widths 4, 8, 16 and condition widths 4, 4, 8 at scales 0-2: (8 + 12 / 4 + 24 / 16) x 4 bytes x 6 alive
    assert tiny.bytes_per_cell() == 300.0
    assert train.validation_batch(tiny, _cfg()) == int(4e9 // (472 * 712 * 300))  # 39 whole fields in 4 GB
    assert train.validation_batch(tiny, _cfg(memory_budget_gb=0.01)) == 1
    assert train.validation_batch(CVAE(ModelConfig(preset="tiny"), 3, (16, 16), (4, 4)), _cfg()) == 64
