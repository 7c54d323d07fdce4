"""EMA weights (optim.ema_decay): the average against its definition and the checkpoint's save
and restore path. The real Ray runs of tests/test_train.py train with EMA on: there a resumed
run keeps its EMA bitwise, and `raymoll evaluate --weights ema` scores the EMA checkpoint."""
from pathlib import Path

import torch
from torch import nn

from raymoll.checkpoint import load_checkpoint, load_model, save_checkpoint
from raymoll.config import load_config
from raymoll.train.ema import WeightEMA
from raymoll.train.loop import build_trainee, checkpoint_state, restore, train_step

CONFIG = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "fashion_small.yaml"
META = {"num_classes": 10, "image_size": [32, 32]}


def _toy() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(144, 3))


def _float_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if v.is_floating_point()}


def _steps(model: nn.Module, ema: WeightEMA, count: int) -> list[dict[str, torch.Tensor]]:
    """`count` SGD steps (train mode: BatchNorm statistics move too), updating `ema` after
    each; returns the model's float state after every step."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    generator, states = torch.Generator().manual_seed(1), []
    for _ in range(count):
        x = torch.randn(8, 3, 8, 8, generator=generator)
        loss = model(x).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ema.update(model)
        states.append(_float_state(model))
    return states


def test_decay_zero_ema_equals_the_raw_weights():
    model = _toy()
    ema = WeightEMA(model, 0.0)
    _steps(model, ema, 4)
    for key, value in _float_state(model).items():
        torch.testing.assert_close(ema.state_dict()[key], value, rtol=0, atol=0)


def test_ema_equals_the_hand_written_average_parameters_and_batchnorm_statistics():
    decay, model = 0.9, _toy()
    ema = WeightEMA(model, decay)
    states = _steps(model, ema, 5)
    expected = dict(states[0])  # the first update copies the weights
    for state in states[1:]:
        expected = {k: decay * expected[k] + (1 - decay) * state[k] for k in expected}
    assert set(ema.state_dict()) == set(model.state_dict())  # the checkpoint contract
    for key, value in expected.items():  # conv/linear weights, BN affine and running stats
        torch.testing.assert_close(ema.state_dict()[key], value, rtol=1e-6, atol=1e-7)
    assert not torch.equal(ema.state_dict()["1.running_mean"], states[-1]["1.running_mean"])


def _cpu_trainee(cfg):
    return build_trainee(cfg, META, torch.device("cpu"), rank=0, steps_per_epoch=10,
                         in_ray_train=False)


def test_a_resumed_run_keeps_its_ema(tmp_path):
    cfg = load_config(CONFIG, ["optim.ema_decay=0.8", "model.width=8", "optim.epochs=1"])
    generator = torch.Generator().manual_seed(2)
    batches = [(torch.randn(8, 3, 32, 32, generator=generator),
                torch.randint(0, 10, (8,), generator=generator)) for _ in range(4)]
    first = _cpu_trainee(cfg)
    for x, y in batches[:3]:
        train_step(first, x, y, bf16=False)
    metrics = {"epoch": 1, "val_score": 0.5, "ema_val_score": 0.6}
    save_checkpoint(tmp_path, checkpoint_state(metrics, first, cfg, META))
    state = load_checkpoint(tmp_path)
    assert state["selected"] == "ema" and set(state["ema"]) == set(state["model"])

    resumed = _cpu_trainee(cfg)
    assert restore(resumed, state) == 1
    for key, value in first.ema.state_dict().items():
        torch.testing.assert_close(resumed.ema.state_dict()[key], value, rtol=0, atol=0)
    # The next step averages into the restored EMA, as in the uninterrupted run (no fresh copy).
    for trainee in (first, resumed):
        trainee.reseed(cfg.run.seed, 0, 1)  # the next epoch's streams, as the loop does
        train_step(trainee, *batches[3], bf16=False)
    for key, value in first.ema.state_dict().items():
        torch.testing.assert_close(resumed.ema.state_dict()[key], value)

    ema_model, loaded = load_model(tmp_path)  # default "selected": the EMA here
    assert loaded["weights"] == "ema"
    raw_model, _ = load_model(tmp_path, weights="raw")
    torch.testing.assert_close(ema_model.state_dict(), state["ema"])
    torch.testing.assert_close(raw_model.state_dict(), state["model"])
