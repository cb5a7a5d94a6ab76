"""`python -m jobs.ppt --config jobs/configs/ppt-pairs.yaml key=value ...`: PPT soft-prompt pre-training (Ray Train)."""
from jobs import run

if __name__ == "__main__":
    run("ppt")
