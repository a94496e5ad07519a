"""Small builders shared by the tests."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def tiny_model(default_vars, img_size=(16, 32), patch_size=2, **kw):
    from climax import ClimaX

    cfg = dict(embed_dim=64, depth=2, decoder_depth=1, num_heads=4, drop_path=0.0, drop_rate=0.0)
    cfg.update(kw)
    return ClimaX(default_vars, img_size=img_size, patch_size=patch_size, **cfg)
