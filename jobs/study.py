"""`ray job submit --working-dir . -- python jobs/study.py ...` = `raymoll study ...` on the cluster."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the submitted working dir's raymoll

from raymoll.cli import main  # noqa: E402

sys.exit(main(["study", *sys.argv[1:]]))
