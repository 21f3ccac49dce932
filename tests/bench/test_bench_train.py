"""``bench train``: the step is the trainer's, the twin is plain with the model's shapes, rows carry what they say."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
from torch import nn

from stablenet.bench.provenance import PROVENANCE_KEYS
from stablenet.bench.train import MODES, ROW_KEYS, WORKLOADS, bench_train, default_models, plain_twin, trainer_step
from stablenet.cli import main
from stablenet.data import dataset_info, load_dataset
from stablenet.models import create_model
from stablenet.nn import LinearNormalized, SLLConv2d, SLLLinear
from stablenet.train import TrainConfig, train
from stablenet.train.optimizers import create_optimizer
from stablenet.train.trainer import loss_from_config

FP32 = (("fp32", False),)


def test_rows_pair_the_model_with_its_twin_and_time_the_loader():
    rows = bench_train(model="sll_mlp", quick=True, modes=(("fp32", False), ("bf16", False)))
    assert [(r["variant"], r["precision"], r["loader"]) for r in rows] == [
        ("constrained", "fp32", None),
        ("plain", "fp32", None),
        ("constrained", "bf16", None),
        ("plain", "bf16", None),
        ("data", None, "device"),
    ]
    for row in rows:
        assert set(ROW_KEYS) <= set(row)
        assert row["images_per_s"] > 0 and row["device"] == "cpu" and row["peak_mem_mb"] is None
        json.dumps(row)
    for constrained, plain in (rows[0:2], rows[2:4]):
        assert constrained["ratio"] == pytest.approx(constrained["images_per_s"] / plain["images_per_s"])
        assert plain["ratio"] == 1.0 and constrained["ratio_to"] == "plain"
        assert constrained["images_per_s"] == pytest.approx(8 / (constrained["step_ms"] / 1e3))
        assert constrained["finite"] and plain["finite"]
        assert plain["plain_params"] == constrained["plain_params"] < constrained["params"]
    data = rows[-1]
    best = max(r["images_per_s"] for r in rows if r["variant"] == "constrained")
    assert data["ratio_to"] == "training" and data["ratio"] == pytest.approx(data["images_per_s"] / best)
    assert data["batches"] == 2 and data["data"] == "random"


def test_twin_has_the_shapes_and_no_constraint():
    torch.manual_seed(0)
    for name, args, shape in [
        ("sll_mlp", {"width": 64, "depth": 2, "inner_width": 16}, (1, 8, 8)),
        ("lipconvnet", {"family": "aol", "width": 4, "hidden": 8}, (1, 8, 8)),
        ("sll_s", WORKLOADS["sll_s"].quick_args, (3, 16, 16)),
    ]:
        net = create_model(name, 10, shape[0], shape[1:], **args)
        x = torch.rand(3, *shape)
        twin = plain_twin(net, x[:1])
        assert twin is not net and twin.training == net.training
        stablenet_layers = [m for m in twin.modules() if type(m).__module__.startswith("stablenet.nn")]
        assert not [m for m in stablenet_layers if isinstance(m, (SLLLinear, SLLConv2d, LinearNormalized))], name
        assert not any(hasattr(m, "parametrizations") for m in twin.modules()), name
        assert twin(x).shape == net(x).shape == (3, 10)
        # same parameters as the model, less SLL's per-channel rescaling q (the tied twin, see the module)
        kept = sum(p.numel() for n, p in net.named_parameters() if not n.endswith("q_log"))
        assert sum(p.numel() for p in twin.parameters()) == kept, name
        twin(x).sum().backward()
        assert all(p.grad is not None for p in twin.parameters()), name
    lone = SLLLinear(6, 5)
    assert isinstance(plain_twin(lone), nn.Module) and plain_twin(lone)(torch.rand(2, 6)).shape == (2, 6)


def test_the_step_is_the_trainers_step(tmp_path):
    """One trainer_step on the whole digits training split gives the weights of one epoch of ``train`` with one
    batch (the trainer shuffles the batch: the mean loss changes by rounding only)."""
    n = len(load_dataset("digits", "train").labels)
    options = dict(model_args={"width": 64, "depth": 2, "inner_width": 16}, crop_padding=0, flip=False)
    config = TrainConfig(
        dataset="digits", epochs=1, batch_size=n, schedule="constant", seed=5, out=str(tmp_path), **options
    )
    trained = train(config, progress=False).model
    info = dataset_info("digits")
    build = dict(mean=info.mean, std=(1.0,), **config.model_args)  # normalize_std is off by default
    torch.manual_seed(config.seed)
    net = create_model(config.model, 10, 1, (8, 8), **build)
    data = load_dataset("digits", "train")
    opt = create_optimizer(config.optimizer, list(net.parameters()), lr=config.lr, weight_decay=config.weight_decay)
    sums, nonfinite = torch.zeros(3, dtype=torch.float64), torch.zeros((), dtype=torch.bool)
    loss_fn = loss_from_config(config, net, (1, 8, 8))
    trainer_step(
        net.train(),
        opt,
        loss_fn,
        data.images,
        data.labels,
        lr=config.lr,
        autocast=contextlib.nullcontext,
        sums=sums,
        nonfinite=nonfinite,
    )
    for (key, a), b in zip(net.state_dict().items(), trained.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0, msg=key)
    assert sums[2] == n and not nonfinite
    moved = [k for k, v in net.state_dict().items() if v.is_floating_point()]
    assert moved  # and the step did move them: a fresh model differs
    torch.manual_seed(config.seed)
    fresh = create_model(config.model, 10, 1, (8, 8), **build)
    assert any(not torch.equal(fresh.state_dict()[k], net.state_dict()[k]) for k in moved)


def test_defaults_follow_the_device():
    assert default_models("cpu") == ("sll_mlp", "lipconvnet")
    assert default_models("cuda:0") == ("sll_s",)
    assert MODES == (("fp32", False), ("bf16", False), ("bf16", True))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"model": "resnet99"}, r"^unknown model\(s\) 'resnet99'; available: "),
        ({"model": ()}, "^model must name at least one model; got none$"),
        ({"modes": (("fp16", False),)}, r"^modes must be among "),
        ({"repeats": 0}, "^repeats must be an integer >= 1; got 0$"),
        ({"batch_size": -2}, "^batch_size must be an integer >= 1; got -2$"),
        ({"data_root": "/data"}, "^data_root is read only by the streaming loader; give data_streaming too$"),
    ],
)
def test_bad_options_are_one_line_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        bench_train(quick=True, **{"model": "sll_mlp", **kwargs})


def test_command_line_writes_rows_with_provenance(tmp_path, capsys):
    out = tmp_path / "train.jsonl"
    code = main(["bench", "train", "--quick", "--model", "sll_mlp", "--repeats", "1", "--quiet", "--json", str(out)])
    assert code == 0
    table = capsys.readouterr().out
    assert "images/s" in table and "data/device" in table
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 7 and {r["model"] for r in rows} == {"sll_mlp"}
    assert all(set(PROVENANCE_KEYS) <= set(r["provenance"]) for r in rows)


def test_command_line_rejects_a_bad_model(capsys):
    assert main(["bench", "train", "--quick", "--model", "nope"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown model(s) 'nope'" in err[0]
