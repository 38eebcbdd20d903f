"""``python -m onnxpress``: the same as the ``onnxpress`` command."""

import sys

from onnxpress.cli import main

sys.exit(main())
