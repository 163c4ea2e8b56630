"""The progress line: one line per interval in a log, the final count printed once."""
import io

from iap_jax.core.progress import Progress


def test_a_log_gets_the_final_count_once():
    stream = io.StringIO()
    meter = Progress("predict", 10, unit="images", stream=stream, every_s=0.0)
    meter.advance(4)
    meter.advance(6)  # printed: the interval has passed
    meter.close()  # nothing new to say
    lines = stream.getvalue().splitlines()
    assert [line.split()[1] for line in lines] == ["4/10", "10/10"]


def test_close_prints_the_final_count_the_interval_held_back():
    stream = io.StringIO()
    meter = Progress("prep", None, stream=stream, every_s=3600.0)
    meter.advance(3)  # the first advance prints (none before it)
    meter.advance(2)  # within the interval: held back
    meter.close()
    assert [line.split()[1] for line in stream.getvalue().splitlines()] == ["3/?", "5/?"]
