"""`ray job submit -- python jobs/finetune.py --config jobs/configs/finetune-sst2.yaml key=value ...`"""
import sys

from rayapp.cli import main

sys.exit(main(["finetune", *sys.argv[1:]]))
