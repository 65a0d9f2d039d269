"""The small default separator shipped inside the package, and example mixtures.

``marsctl separate`` uses :data:`DEFAULT_SEPARATOR_DIR` when no ``--model`` is given. It was
trained by ``recipes/train/union-small.yaml`` on the offline ``union`` corpus (10 instruments
rendered with several General-MIDI soundfonts and 48 everyday-sound classes from Debian data
packages), ships the encoder aligned on that corpus (``recipes/align/union.yaml``), and was
packaged by ``python -m marsctl.pretrained.package`` (see that module and the model card
``separator/README.md`` for how it was trained and its SI-SDRi on held-out test mixtures).
"""

from pathlib import Path

PRETRAINED_DIR = Path(__file__).parent
#: the default separator (config.json + model.safetensors + README.md; its query encoder in encoder/)
DEFAULT_SEPARATOR_DIR = PRETRAINED_DIR / "separator"
#: a few real held-out test mixtures to try it on (one per pair kind: instruments, everyday sounds, one of each)
EXAMPLES_DIR = PRETRAINED_DIR / "examples"
#: each example's sources as they sit in the mix (example_references/<example>/<query slug>.flac) and mixture.flac
EXAMPLE_REFERENCES_DIR = PRETRAINED_DIR / "example_references"
