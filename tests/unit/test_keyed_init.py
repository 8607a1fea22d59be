"""Keyed initialisation (models/init.py): values depend only on (seed, name, tile), so any box of a parameter drawn
alone equals the slice of the whole; the specs describe what the stream scheme draws; the switch is a config
field with a one-line error; CPU runs keep the stream scheme unless asked."""

from __future__ import annotations

import pytest
import torch
import yaml

from meshwright.config import TrainConfig, load_train_config
from meshwright.config.io import dump_yaml, from_dict
from meshwright.errors import ConfigError
from meshwright.models import build_model, init as keyed
from meshwright.models.init import ParamInit, fill_keyed, resolve_init


def one_line(exc) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def full(shape, spec, seed=3):
    t = torch.empty(shape)
    fill_keyed(t, shape, (0,) * len(shape), spec, seed)
    return t


@pytest.mark.parametrize("shape,boxes", [
    ((40, 56), [((0, 0), (40, 56)), ((8, 0), (16, 56)), ((3, 5), (21, 30)), ((0, 28), (40, 28)), ((39, 55), (1, 1))]),
    ((300,), [((0,), (300,)), ((17,), (150,)), ((299,), (1,))]),
    ((3, 20, 12), [((1, 0, 0), (2, 20, 12)), ((0, 5, 3), (3, 9, 9))]),
])
def test_a_box_drawn_alone_equals_the_slice_of_the_whole(monkeypatch, shape, boxes):
    monkeypatch.setattr(keyed, "TILE", 8)  # many tiles, cut in every way
    monkeypatch.setattr(keyed, "TILE_1D", 64)
    spec = ParamInit("normal", "layers.0.attention.wq.weight", 0.02)
    whole = full(shape, spec)
    assert 0.015 < whole.std().item() < 0.025
    for offset, size in boxes:
        part = torch.empty(size)
        fill_keyed(part, shape, offset, spec, 3)
        assert torch.equal(part, whole[tuple(slice(o, o + n) for o, n in zip(offset, size))]), (offset, size)


def test_a_shard_draws_its_tiles_only_and_the_key_decides_the_values(monkeypatch):
    monkeypatch.setattr(keyed, "TILE", 8)
    spec = ParamInit("normal", "output.weight", 1.0)
    part = torch.empty(16, 64)
    assert fill_keyed(part, (64, 64), (16, 0), spec, 3) == 16 * 64  # tile-aligned rows: exactly the shard
    assert fill_keyed(torch.empty(12, 64), (64, 64), (20, 0), spec, 3) == 16 * 64  # cut mid-tile: one tile row more
    assert fill_keyed(torch.empty(64, 64), (64, 64), (0, 0), ParamInit("zeros", "x"), 3) == 0
    assert not torch.equal(full((64, 64), spec, seed=3), full((64, 64), spec, seed=4))
    assert not torch.equal(full((64, 64), spec), full((64, 64), ParamInit("normal", "tok_embeddings.weight", 1.0)))


@pytest.mark.parametrize("model", ["tiny", "gpt2-small", "tiny-moe"])
def test_specs_cover_every_parameter_with_what_the_stream_draws(model):
    stream = build_model(model, seed=11)
    specs = stream.init_specs()
    params = dict(stream.named_parameters(remove_duplicate=False))
    assert set(specs) == set(params)
    for name, p in params.items():
        spec = specs[name]
        if spec.kind != "normal":
            assert torch.equal(p, torch.full_like(p, 0.0 if spec.kind == "zeros" else 1.0)), name
        elif p.numel() >= 4096:
            assert abs(p.std().item() / spec.std - 1) < 0.1 and abs(p.mean().item()) < spec.std / 10, name


@pytest.mark.parametrize("model", ["tiny", "gpt2-small", "tiny-moe"])
def test_keyed_model_is_reproducible_tied_and_follows_its_specs(model):
    a, b = build_model(model, seed=5, init="keyed"), build_model(model, seed=5, init="keyed")
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.tok_embeddings.weight, build_model(model, seed=6, init="keyed").tok_embeddings.weight)
    stream = build_model(model, seed=5)
    assert not torch.equal(a.tok_embeddings.weight, stream.tok_embeddings.weight)  # another scheme, other values
    if a.cfg.tie_embeddings:
        assert a.output.weight is a.tok_embeddings.weight
    if a.rope_cos is not None:  # computed buffers equal the stream model's
        assert torch.equal(a.rope_cos, stream.rope_cos) and torch.equal(a.rope_sin, stream.rope_sin)
    for name, p in a.named_parameters():
        spec = a.init_specs()[name]
        if spec.kind != "normal":
            assert torch.equal(p, torch.full_like(p, 0.0 if spec.kind == "zeros" else 1.0)), name
        elif p.numel() >= 4096:
            assert abs(p.std().item() / spec.std - 1) < 0.1, name


def test_init_choice_resolves_per_device_and_bad_values_are_one_line():
    assert resolve_init("auto", "cpu") == "stream" and resolve_init("auto", "cuda") == "keyed"
    assert resolve_init("keyed", "cpu") == "keyed" and resolve_init("stream", "cuda") == "stream"
    with pytest.raises(ConfigError) as exc:
        resolve_init("random", "cpu")
    assert "init='random' is invalid" in one_line(exc)
    with pytest.raises(ConfigError) as exc:
        build_model("tiny", seed=1, init="hashed")
    assert "init='hashed' is invalid" in one_line(exc)


def test_train_config_field_round_trips_and_rejects_bad_values():
    assert TrainConfig().init == "auto"
    cfg = from_dict(TrainConfig, {"init": "keyed"})
    assert cfg.init == "keyed" and from_dict(TrainConfig, yaml.safe_load(dump_yaml(cfg))) == cfg
    with pytest.raises(ConfigError) as exc:
        load_train_config({"init": "per_param"})
    assert "init='per_param' is invalid; valid: one of 'auto', 'stream', 'keyed'" in one_line(exc)


def test_the_one_process_runtime_starts_from_the_chosen_scheme(tmp_path):
    from meshwright.train.build import build_runtime

    base = {"model": "tiny", "seq_len": 32, "global_batch": 2, "micro_batch": 2, "steps": 1, "warmup_steps": 0,
            "out_dir": str(tmp_path)}
    device = "cuda" if torch.cuda.is_available() else "cpu"  # where the runtime trains, and keyed draws
    auto = build_model("tiny", seed=9, init="keyed", device=device) if device == "cuda" else build_model("tiny", seed=9)
    for init, ref in (("keyed", build_model("tiny", seed=9, init="keyed", device=device)), ("auto", auto)):
        rt = build_runtime(load_train_config({**base, "init": init, "seed": 9}))
        got = dict(rt.model.named_parameters())
        assert rt.init == resolve_init(init, device)
        assert all(torch.equal(got[n], p.to(got[n].device)) for n, p in ref.named_parameters()), init


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_keyed_draws_on_the_gpu_and_auto_picks_it_there():
    model = build_model("tiny", seed=2, device="cuda", init="keyed")
    assert all(p.is_cuda for p in model.parameters())
    again = build_model("tiny", seed=2, device="cuda", init="keyed")
    assert all(torch.equal(x, y) for x, y in zip(model.parameters(), again.parameters()))
    assert resolve_init(TrainConfig().init, "cuda") == "keyed"
    spec = ParamInit("normal", "layers.0.feed_forward.w1.weight", 0.02)  # a box cut inside tiles, drawn on the GPU
    whole = torch.empty(3000, 2500, device="cuda")
    fill_keyed(whole, (3000, 2500), (0, 0), spec, 3)
    part = torch.empty(1000, 1300, device="cuda")
    fill_keyed(part, (3000, 2500), (700, 900), spec, 3)
    assert torch.equal(part, whole[700:1700, 900:2200])
