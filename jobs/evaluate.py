"""`python -m jobs.evaluate --config jobs/configs/finetune-rte.yaml key=value ...`: zero-shot prompt evaluation."""
from jobs import run

if __name__ == "__main__":
    run("evaluate")
