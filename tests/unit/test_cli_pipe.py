"""A command whose reader goes away (`magne inspect | head`) ends quietly: no BrokenPipeError traceback."""

import subprocess
import sys

SCRIPT = """
import sys
from magne import cli, sendcli
def chatty(args):
    for i in range(100000):
        print("line", i)
    return 0
sendcli.run = chatty
sys.exit(cli.main(["send", "t", "--url", "amqp://127.0.0.1:1/"]))
"""


def test_a_reader_that_leaves_early_gets_no_traceback():
    p = subprocess.Popen([sys.executable, "-c", SCRIPT], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout is not None and p.stderr is not None
    assert p.stdout.readline().startswith(b"line 0")
    p.stdout.close()  # the reader leaves, as `head` does
    err = p.stderr.read().decode()
    assert p.wait(30) == 1
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
