"""`python -m jobs.backtranslate --config jobs/configs/backtranslate-bt10.yaml key=value ...`: back-translated few-shot splits (Ray Data, GPU actors)."""
from jobs import run

if __name__ == "__main__":
    run("backtranslate")
