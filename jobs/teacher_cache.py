"""`ray job submit -- python jobs/teacher_cache.py --examples s3://... --teacher roberta-large --out s3://...`"""
import sys

from rayapp.cli import main

sys.exit(main(["teacher-cache", *sys.argv[1:]]))
