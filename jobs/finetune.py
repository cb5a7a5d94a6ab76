"""`python -m jobs.finetune --config jobs/configs/finetune-rte.yaml key=value ...`: few-shot prompt fine-tuning (Ray Train)."""
from jobs import run

if __name__ == "__main__":
    run("finetune")
