"""`ray job submit --working-dir . -- python jobs/prepare.py ...` = `raymoll prepare ...` on the cluster."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the submitted working dir's raymoll

from raymoll.cli import main  # noqa: E402

sys.exit(main(["prepare", *sys.argv[1:]]))
