"""W7, taskd: the function, registered with taskd.App; run as the queue's worker."""
import taskd

app = taskd.App(queue="w7")


@app.task
def echo(x):
    return x


if __name__ == "__main__":
    app.run()
