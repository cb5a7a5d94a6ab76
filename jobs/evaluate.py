"""`ray job submit -- python jobs/evaluate.py --config jobs/configs/finetune-sst2.yaml key=value ...`"""
import sys

from rayapp.cli import main

sys.exit(main(["evaluate", *sys.argv[1:]]))
