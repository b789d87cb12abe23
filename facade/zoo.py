"""The built-in model zoo (``accelc export``, ``accelc bench --model NAME``): small CNNs as torch
modules, built with deterministic weights, checked against the input shape and the memory limit
before they are allocated, and exported for training with :func:`accelc.compiler.export.export`."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import checks
from .compiler.errors import InvalidType, InvalidValue, show
from .compiler.export import check_output_file, export, first_line


class CNN3(nn.Module):
    """3-conv CIFAR-style net: conv-relu-pool ×3, flatten→FC (the net of ORT-FACTS)."""

    def __init__(self, in_ch=3, num_classes=10, size=32, widths=(64, 128, 256)):
        super().__init__()
        c1, c2, c3 = widths
        self.c1 = nn.Conv2d(in_ch, c1, 3, padding=1)
        self.c2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.c3 = nn.Conv2d(c2, c3, 3, padding=1)
        self.fc = nn.Linear(c3 * (size // 8) ** 2, num_classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.c1(x)), 2)
        x = F.max_pool2d(F.relu(self.c2(x)), 2)
        x = F.max_pool2d(F.relu(self.c3(x)), 2)
        return self.fc(x.flatten(1))


class VGG(nn.Module):
    """VGG-style net with BatchNorm: 3 stages of 2×(conv-bn-relu) + max-pool, flatten→FC→FC."""

    def __init__(self, in_ch=1, num_classes=10, size=28, widths=(32, 64, 128)):
        super().__init__()
        layers, c = [], in_ch
        for w in widths:
            layers += [
                nn.Conv2d(c, w, 3, padding=1, bias=False),
                nn.BatchNorm2d(w),
                nn.ReLU(),
                nn.Conv2d(w, w, 3, padding=1, bias=False),
                nn.BatchNorm2d(w),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]
            c = w
        self.features = nn.Sequential(*layers)
        s = size
        for _ in widths:
            s //= 2
        self.fc1 = nn.Linear(c * s * s, 256)
        self.fc2 = nn.Linear(256, num_classes)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(self.features(x).flatten(1))))


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (x if self.down is None else self.down(x)))


class ResNet(nn.Module):
    """CIFAR-style ResNet: BasicBlocks, strided convs, 1×1 shortcuts, global average pool → FC."""

    def __init__(self, in_ch=3, num_classes=10, blocks=(1, 1, 1), widths=(16, 32, 64)):
        super().__init__()
        self.stem = nn.Conv2d(in_ch, widths[0], 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(widths[0])
        layers, c = [], widths[0]
        for i, (n, w) in enumerate(zip(blocks, widths)):
            for j in range(n):
                layers.append(BasicBlock(c, w, 2 if (j == 0 and i > 0) else 1))
                c = w
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        x = self.layers(x)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class LargeKernel(nn.Module):
    """Large-kernel net for kernel rescaling: 7×7/2 and 5×5/2 convs, then 3×3, flatten→FC."""

    def __init__(self, in_ch=1, num_classes=10, size=64):
        super().__init__()
        self.c1 = nn.Conv2d(in_ch, 32, 7, 2, 3)
        self.c2 = nn.Conv2d(32, 64, 5, 2, 2)
        self.c3 = nn.Conv2d(64, 64, 3, 1, 1)
        self.fc = nn.Linear(64 * (size // 8) ** 2, num_classes)

    def forward(self, x):
        x = F.relu(self.c1(x))
        x = F.relu(self.c2(x))
        x = F.max_pool2d(F.relu(self.c3(x)), 2)
        return self.fc(x.flatten(1))


# name -> (builder(in_ch, num_classes, size), default (C, H, W), description)
ZOO = {
    "cnn3": (lambda c, k, s: CNN3(c, k, s), (3, 32, 32), "3-conv CIFAR-style net (64-128-256), max-pool, FC head"),
    "cnn3-small": (lambda c, k, s: CNN3(c, k, s, widths=(16, 32, 64)), (1, 28, 28), "3-conv net (16-32-64) for tests"),
    "vgg": (lambda c, k, s: VGG(c, k, s), (1, 28, 28), "VGG-style net with BatchNorm (32-64-128), FC head"),
    "resnet": (lambda c, k, s: ResNet(c, k), (3, 32, 32), "small CIFAR ResNet (16-32-64, 1 block/stage)"),
    "resnet18": (
        lambda c, k, s: ResNet(c, k, blocks=(2, 2, 2, 2), widths=(64, 128, 256, 512)),
        (3, 32, 32),
        "ResNet-18 (11.2M parameters)",
    ),
    "largekernel": (lambda c, k, s: LargeKernel(c, k, s), (1, 64, 64), "7×7/2 and 5×5/2 convs (large kernels)"),
}


EXPORT_BATCH = 2  # the batch of the example input a zoo model is traced with
CPU_DRY_RUN_BYTES = 1 << 30  # below this bound (and half the memory limit) the dry run computes on the CPU


def _built_on_meta(build, shape: tuple, num_classes: int) -> nn.Module:
    """The model built on torch's meta device: its parameters have shapes but no storage."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.device("meta"):
            return build(shape[0], num_classes, shape[1])


def _activation_bound(meta_module: nn.Module, shape: tuple) -> int:
    """A generous bound on the bytes of one traced forward at EXPORT_BATCH: every leaf layer's
    output as wide as the widest layer at full resolution."""
    widths = [shape[0]] + [
        getattr(m, "out_channels", 0) or getattr(m, "out_features", 0) for m in meta_module.modules()
    ]
    leaves = sum(1 for m in meta_module.modules() if not list(m.children()))
    return 4 * EXPORT_BATCH * shape[1] * shape[2] * max(widths) * max(leaves, 1)


def _dry_run(build, shape: tuple, num_classes: int, device: str):
    """Build the model on ``device`` and run it once on a zero batch, without gradients.
    ``"meta"`` computes shapes only (no memory, no arithmetic; its first use imports a few
    seconds of torch), the CPU computes for real (milliseconds for a small input). Returns
    (activation elements, None) or (None, (where, reason))."""
    stack: list[str] = []
    done: list[str] = []
    acts = [0]
    with warnings.catch_warnings(), torch.no_grad(), torch.device(device):
        warnings.simplefilter("ignore")
        module = build(shape[0], num_classes, shape[1])
        module.train()
        names = {m: n for n, m in module.named_modules()}

        def pre(m, args):
            stack.append(names[m] or "")

        def post(m, args, out):
            stack.pop()
            if not list(m.children()):
                done.append(names[m])
            if isinstance(out, torch.Tensor):
                acts[0] += out.numel()

        hooks = [m.register_forward_pre_hook(pre) for m in module.modules()]
        hooks += [m.register_forward_hook(post) for m in module.modules()]
        try:
            module(torch.zeros(EXPORT_BATCH, *shape))
        except (RuntimeError, ValueError, IndexError) as e:
            inner = stack[-1] if stack else ""
            if not inner:
                where = f"the step after layer '{show(done[-1], 60)}'" if done else "the first step"
            else:
                where = f"layer '{show(inner, 60)}'"
            return None, (where, first_line(e))
        finally:
            for h in hooks:
                h.remove()
    return acts[0], None


def _device_for(meta_module: nn.Module, shape: tuple, memory_limit_gb) -> str:
    from .compiler.resources import memory_limit

    cheap = min(CPU_DRY_RUN_BYTES, memory_limit(memory_limit_gb) // 2)
    return "cpu" if _activation_bound(meta_module, shape) <= cheap else "meta"


def _smallest_size(build, shape: tuple, num_classes: int, memory_limit_gb, limit: int = 1024) -> int | None:
    """The smallest square H=W the model runs at, or None."""
    for s in range(1, limit + 1):
        size = (shape[0], s, s)
        device = _device_for(_built_on_meta(build, size, num_classes), size, memory_limit_gb)
        if _dry_run(build, size, num_classes, device)[1] is None:
            return s
    return None


def zoo_module(
    name: str, input_shape=None, num_classes: int = 10, seed: int = 0, memory_limit_gb: float | None = None
) -> tuple[nn.Module, tuple]:
    """Build zoo model ``name`` with deterministic initial weights; returns (module, (C, H, W)).

    Every argument is checked first (``--input-shape``, ``--num-classes``, ``--seed``). Then the
    model is built on torch's meta device (no storage) to count its parameters, and -- at an input
    shape other than the zoo's own -- run once on a zero batch (on the CPU when that is cheap,
    else on the meta device: shapes only), so an input the model cannot run at is one line naming
    the failing layer and the smallest size that works, and a model too big for memory is refused
    with its estimate before it is allocated."""
    if not isinstance(name, str):
        raise InvalidType(f"the zoo model name must be a string, got {type(name).__name__}")
    if name not in ZOO:
        raise InvalidValue(f"unknown model '{show(name, 60)}'; the zoo has: {', '.join(ZOO)}")
    build, default_shape, _ = ZOO[name]
    shape = checks.input_shape("--input-shape", input_shape) if input_shape is not None else default_shape
    num_classes = checks.positive_int("--num-classes", num_classes, checks.MAX_CLASSES)
    seed = checks.seed("--seed", seed)
    checks.memory_limit_gb(memory_limit_gb)
    from .compiler.resources import check_memory

    text = ",".join(map(str, shape))
    what = f"exporting model '{name}' at input {text} with {num_classes} classes"
    meta = _built_on_meta(build, shape, num_classes)
    params = sum(p.numel() for p in meta.parameters())
    # float32 weights held by the module, its saved copy, the ONNX proto and its bytes
    check_memory(f"{what} ({params:,} parameters)", 4 * 4 * params, memory_limit_gb)
    if tuple(shape) == tuple(default_shape):  # the zoo's own input: known to fit, and small
        torch.manual_seed(seed)
        return build(shape[0], num_classes, shape[1]), shape
    acts, failure = _dry_run(build, shape, num_classes, _device_for(meta, shape, memory_limit_gb))
    if failure is not None:
        where, reason = failure
        smallest = _smallest_size(build, shape, num_classes, memory_limit_gb)
        if smallest is not None and min(shape[1:]) < smallest:
            problem, hint = "is too small for", f"the smallest input it runs at is {shape[0]},{smallest},{smallest}"
        else:
            problem, hint = "does not fit", f"its default input is {','.join(map(str, default_shape))}"
        raise InvalidValue(f"--input-shape {text} {problem} model '{name}': {where} fails ({reason}); {hint}")
    # ... and the activations of the traced batch, with their gradients' worth of headroom
    check_memory(f"{what} ({params:,} parameters)", 4 * (4 * params + 2 * acts), memory_limit_gb)
    torch.manual_seed(seed)
    return build(shape[0], num_classes, shape[1]), shape


def export_zoo(
    name: str, path, input_shape=None, num_classes: int = 10, seed: int = 0, memory_limit_gb: float | None = None
) -> Path:
    """Write zoo model ``name`` to ``path`` (``accelc export``); ``input_shape`` is C,H,W (a
    sequence or the CLI's "C,H,W" text). Every argument is checked before anything is written."""
    check_output_file("-o", path)
    module, shape = zoo_module(name, input_shape, num_classes, seed, memory_limit_gb)
    return export(module, torch.zeros(EXPORT_BATCH, *shape), path)
