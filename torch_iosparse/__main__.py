"""``python -m torch_iosparse explain|plan|bench MODEL_FILE`` (see torch_iosparse/cli.py)."""
import sys

from .cli import main

sys.exit(main())
