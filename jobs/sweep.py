"""`python -m jobs.sweep --config jobs/configs/<sweep>.yaml key=value ...`: a Ray Tune sweep over the fine-tuning grid."""
from jobs import run

if __name__ == "__main__":
    run("sweep")
