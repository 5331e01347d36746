"""``python -m torch_iosparse explain|plan|bench MODEL_FILE`` (see torch_iosparse/tools/cli.py)."""
import sys

from .tools.cli import main

sys.exit(main())
