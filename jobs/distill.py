"""`python -m jobs.distill --config jobs/configs/distill-smash-pairs.yaml key=value ...`: SMASH distillation (Ray Train)."""
from jobs import run

if __name__ == "__main__":
    run("distill")
