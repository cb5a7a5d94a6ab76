"""`python -m jobs.predict MODEL --config jobs/configs/predict.yaml key=value ...`: an exported model labels a table (Ray Data, GPU actors)."""
from jobs import run

if __name__ == "__main__":
    run("predict")
