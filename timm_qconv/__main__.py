"""``python -m timm_qconv``: the same tool as the ``timm-qconv`` command."""
import sys

from .cli import main

sys.exit(main())
