"""The small default separator shipped inside the package, and example mixtures.

``marsctl separate`` uses :data:`DEFAULT_SEPARATOR_DIR` when no ``--model`` is given. It was
trained by ``recipes/train/soundfont-small.yaml`` on the offline ``soundfont`` dataset
(real General-MIDI instrument samples playing folk-song melodies) and packaged by
``python -m marsctl.pretrained.package`` (see that module and the model card
``separator/README.md`` for how it was trained and its SI-SDRi on held-out melodies).
"""

from pathlib import Path

PRETRAINED_DIR = Path(__file__).parent
#: the default separator (config.json + model.safetensors + README.md; its query encoder in encoder/)
DEFAULT_SEPARATOR_DIR = PRETRAINED_DIR / "separator"
#: a few real mixtures of held-out melodies to try it on
EXAMPLES_DIR = PRETRAINED_DIR / "examples"
#: each example's sources as they sit in the mix (example_references/<example>/<query slug>.flac) and mixture.flac
EXAMPLE_REFERENCES_DIR = PRETRAINED_DIR / "example_references"
