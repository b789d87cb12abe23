"""Export torch modules to ONNX *for training*, and the built-in model zoo.

Exporting in eval mode lets torch fold BatchNorm into Conv, which silently breaks training, so
this helper always exports in training mode without constant folding.
"""

from __future__ import annotations

import collections
import copy
import errno
import io
import json
import os
import stat
import warnings
from pathlib import Path

import onnx
import torch
import torch.nn as nn
import torch.nn.functional as F
from onnx import numpy_helper

from . import checks
from .errors import AccelcError, InvalidType, InvalidValue, show
from .fileio import atomic_write_bytes, output_state
from .model import TRAINABLE_KEY

OPSET = 17


def export_bytes(module: nn.Module, example_input: torch.Tensor) -> bytes:
    """Return the ONNX bytes of ``module`` exported for training (BatchNorm kept, batch dim dynamic)."""
    was_training = module.training
    module.train()
    # BatchNorm running statistics must not move during export.
    # (a copy of the state dict keeps its _metadata: modules such as torchvision's MNASNet read
    # their version from it when the state is loaded back)
    state = module.state_dict()
    saved = collections.OrderedDict((k, v.clone()) for k, v in state.items())
    if hasattr(state, "_metadata"):
        saved._metadata = copy.deepcopy(state._metadata)
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                (example_input,),
                buf,
                input_names=["input"],
                output_names=["output"],
                dynamic_axes={"input": {0: "N"}, "output": {0: "N"}},
                opset_version=OPSET,
                training=torch.onnx.TrainingMode.TRAINING,
                do_constant_folding=False,
                dynamo=False,
            )
    except (RuntimeError, ValueError, TypeError, IndexError) as e:
        # the module cannot run (or be traced) on this input: a wrong example shape, most often
        raise InvalidValue(
            f"cannot export {type(module).__name__} with an example input of shape "
            f"{','.join(map(str, example_input.shape))}: {_first_line(e)}"
        ) from None
    finally:
        module.load_state_dict(saved)
        module.train(was_training)
    # Tracing ran one training-mode forward, which moved BatchNorm running statistics before torch
    # captured them as initialisers: put the module's true values back.

    model = onnx.load_model_from_string(buf.getvalue())
    if len(model.graph.output) != 1:  # a tuple, list or dict of tensors: accelc trains one logits output
        raise InvalidValue(
            f"{type(module).__name__} returns {len(model.graph.output)} outputs (a tuple, list or dict?); "
            "accelc trains a module whose forward returns one tensor, the logits (N, classes): return only those"
        )
    for i, t in enumerate(model.graph.initializer):
        if t.name in saved and ("running_" in t.name or "num_batches" in t.name):
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(saved[t.name].cpu().numpy(), t.name))
    # torch's own list of what trains, so the compiler trains exactly that (a layer scale used by
    # Mul included) and says so when a parameter did not survive export as an initialiser
    trainable = [name for name, p in module.named_parameters() if p.requires_grad]
    model.metadata_props.add(key=TRAINABLE_KEY, value=json.dumps(trainable))
    return model.SerializeToString()


def _first_line(e: BaseException) -> str:
    """torch's reason: its first paragraph (what follows a blank line is a trace), never cut at a
    newline inside it (one in a module name is escaped)."""
    text = str(e).strip().split("\n\n", 1)[0].strip()
    return show(text or type(e).__name__, 240)


def check_export_args(module, example_input, path) -> Path:
    """``export``'s arguments checked (InvalidType/InvalidValue); returns the path."""
    if not isinstance(module, nn.Module):
        raise InvalidType(f"module must be a torch.nn.Module, got {type(module).__name__}")
    if not isinstance(example_input, torch.Tensor):
        raise InvalidType(f"example_input must be a torch.Tensor, got {type(example_input).__name__}")
    if example_input.dim() < 1 or example_input.shape[0] < 1:
        raise InvalidValue(
            f"example_input must have a batch dimension first (N >= 1), got shape {tuple(example_input.shape)}"
        )
    return check_output_file("path", path)


def check_output_file(flag: str, path) -> Path:
    """A file path to write: its folder exists (and is a folder), the path is not a folder and
    resolves without a symbolic link loop. Checked before any work (an export takes seconds)."""
    path = checks.path_like(flag, path)
    try:
        st = os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise InvalidValue(f"{flag} '{show(path)}' is a symbolic link loop (or goes through one)") from None
        if e.errno not in (errno.ENOENT, errno.ENOTDIR):
            raise InvalidValue(f"{flag} '{show(path)}': {e.strerror or e}") from None
        st = None
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise InvalidValue(f"{flag} '{show(path)}' is a folder; give a file path such as {show(path / 'model.onnx')}")
    parent = path.parent
    try:
        pst = os.stat(parent)
    except OSError as e:
        if e.errno == errno.ENOENT:
            raise InvalidValue(f"{flag} '{show(path)}': folder '{show(parent)}' does not exist") from None
        raise InvalidValue(f"{flag} '{show(path)}': '{show(parent)}': {e.strerror or e}") from None
    if not stat.S_ISDIR(pst.st_mode):
        raise InvalidValue(f"{flag} '{show(path)}': '{show(parent)}' is not a folder")
    return path


def export(module: nn.Module, example_input: torch.Tensor, path: str | os.PathLike) -> Path:
    """Export any torch module for training with accelc; written atomically to ``path``."""
    path = check_export_args(module, example_input, path)
    found = output_state(path)  # replaced only if still there, unchanged, once the export is done
    data = export_bytes(module, example_input)
    try:
        atomic_write_bytes(path, data, expect=found)
    except OSError as e:  # the folder went away, a full disk, no permission: one line
        raise AccelcError(f"cannot write '{show(path)}': {e.strerror or e}") from None
    return path


# ----------------------------------------------------------------------------- model zoo
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
            return None, (where, _first_line(e))
        finally:
            for h in hooks:
                h.remove()
    return acts[0], None


def _device_for(meta_module: nn.Module, shape: tuple, memory_limit_gb) -> str:
    from .resources import memory_limit

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
    from .resources import check_memory

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
