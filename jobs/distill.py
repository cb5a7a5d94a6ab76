"""`ray job submit -- python jobs/distill.py --config jobs/configs/distill-smash-pairs.yaml key=value ...`"""
import sys

from rayapp.cli import main

sys.exit(main(["distill", *sys.argv[1:]]))
