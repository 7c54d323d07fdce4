import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from raymoll.models import MODEL_NAMES, build_model


@pytest.fixture(autouse=True)
def _one_thread():
    # Several test processes share the machine's cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_logits_shape_and_one_training_step(name, size):
    torch.manual_seed(0)
    model = build_model(name, num_classes=7)
    x, y = torch.randn(2, 3, size, size), torch.tensor([1, 5])
    before = [p.detach().clone() for p in model.parameters()]

    logits = model(x)
    assert logits.shape == (2, 7)
    F.cross_entropy(logits, y).backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()

    for p, p0 in zip(model.parameters(), before):
        assert torch.isfinite(p.grad).all()
        assert not torch.equal(p.detach(), p0), "every parameter should get a gradient"


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_single_channel_input(name):
    model = build_model(name, num_classes=10, in_channels=1).eval()
    with torch.no_grad():
        logits = model(torch.randn(2, 1, 32, 32))
    assert logits.shape == (2, 10)
    assert torch.isfinite(logits).all()


def test_smallcnn_fits_a_fixed_batch():
    torch.manual_seed(0)
    model = build_model("smallcnn", num_classes=4, width=16)
    x, y = torch.randn(8, 3, 32, 32), torch.arange(8) % 4
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(30):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_smallcnn_training_step_is_under_one_gflop_per_image():
    model = build_model("smallcnn", num_classes=10)
    with FlopCounterMode(display=False) as counter:
        model(torch.randn(4, 3, 32, 32)).sum().backward()
    assert counter.get_total_flops() / 4 < 1e9


def test_smallcnn_width_sets_channels():
    narrow = build_model("smallcnn", num_classes=10, width=8)
    convs = [m for m in narrow.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [8, 16, 32]


def test_unknown_name_lists_the_choices():
    with pytest.raises(ValueError, match="preactresnet18.*smallcnn|smallcnn.*preactresnet18"):
        build_model("resnet9000", num_classes=10)


def test_non_positive_class_count_is_rejected():
    with pytest.raises(ValueError, match="num_classes"):
        build_model("smallcnn", num_classes=0)
