"""Datasets for ``accelc train`` and ``accelc bench``, shaped to the model's input.

Specs (``--data``):
  synthetic[:N]          built in, deterministic, no download: N training images (default 6000)
  fashion-mnist[:DIR]    IDX files (default DIR /usr/share/datasets/fashion-mnist, Debian's
                         dataset-fashion-mnist package)
  fashion-mnist-multiscale[:DIR]
                         64x64 canvases of 1-3 Fashion-MNIST items at scales 0.5-1.5x, labelled by
                         the largest (the same IDX files; see :mod:`.multiscale`)
  imagefolder:DIR        DIR/<class>/*.png|jpg (or DIR/train/<class>, DIR/test/<class>)

Data given in Python (``accelc.train(..., data=...)``; :func:`in_memory_data`):
``(x_train, y_train, x_test, y_test)`` numpy arrays or torch tensors, ``(train, test)`` with each
a torch ``Dataset``, ``DataLoader`` or ``(x, y)`` pair, or a dict with those four keys. Images are
N, C, H, W floating point at the model's input shape and are used as given (not resized, not
normalised: preprocess them as for torch); labels are integer class indices. A torch dataset is
read once into memory (random transforms apply once); a shuffling DataLoader reads in another
order each time, so give its Dataset instead to resume a run (accelc shuffles by its seed).

Every dataset given as a spec is adapted to the model input (channels replicated or averaged,
bilinear resize) and normalised to zero mean / unit variance with training-set statistics.
Shuffling is seeded per epoch, so two runs with one seed see the same batches.

Data files are untrusted: every label is checked against the model's class count, image and label
counts must agree, and a damaged file is one clear error naming it. The memory a dataset needs is
estimated from its headers (IDX dimensions, file counts, N for synthetic) and checked against the
limit *before* anything large is read or generated, so a gzip bomb or ``synthetic:100000000`` is
refused in a second instead of exhausting the machine.

Modules: :mod:`.dataset` (the Dataset, fitting images to the model input, label checks),
:mod:`.synth` (synthetic), :mod:`.idx` (IDX files: Fashion-MNIST), :mod:`.multiscale` (its
multi-scale canvases), :mod:`.folder` (image folders), :mod:`.arrays` (data given in Python), :mod:`.split` (the validation split), :mod:`.source` (the
:class:`DataSource` a run records) and :mod:`.loader` (:func:`load_data`, :func:`check_data`).
"""

from .arrays import check_data_form, in_memory_data
from .dataset import Dataset, adapt, resize
from .folder import image_folder
from .idx import fashion_mnist
from .loader import as_source, check_data, load_data
from .multiscale import Layout, compose, layout
from .source import DataSource
from .split import parse_val_split, take_validation
from .synth import _synthetic_bytes, synthetic

# the names other modules import from here; a module's tunable constants (MAX_STREAM_SAMPLES,
# MAX_GZIP_EXPANSION, ...) live, and are patched, in the module that reads them
__all__ = [
    "DataSource",
    "Dataset",
    "Layout",
    "_synthetic_bytes",
    "adapt",
    "as_source",
    "check_data",
    "check_data_form",
    "compose",
    "fashion_mnist",
    "image_folder",
    "in_memory_data",
    "layout",
    "load_data",
    "parse_val_split",
    "resize",
    "synthetic",
    "take_validation",
]
