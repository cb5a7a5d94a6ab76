"""`ray job submit -- python jobs/intermediate.py pairs --corpus s3://... --out s3://... --num-examples 2560000`"""
import sys

from rayapp.cli import main

sys.exit(main(["intermediate", *sys.argv[1:]]))
