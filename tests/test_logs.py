"""Stage logging: readable lines in the rule's log; a failure is logged with its message and re-raised."""

from __future__ import annotations

import logging

import pytest

from precip_cvae.logs import stage_logging


def test_stage_logging_writes_start_lines_and_finish(tmp_path):
    log_path = tmp_path / "logs" / "stage.log"
    with stage_logging(log_path, "demo_stage") as log:
        log.info("halfway: %d of %d", 5, 10)
    text = log_path.read_text().splitlines()
    assert "stage demo_stage started" in text[0]
    assert text[1].endswith("precip_cvae.demo_stage: halfway: 5 of 10")
    assert "stage demo_stage finished in" in text[-1]


def test_stage_logging_records_the_error_and_reraises(tmp_path):
    log_path = tmp_path / "stage.log"
    with pytest.raises(ValueError, match="bad units"):
        with stage_logging(log_path, "broken"):
            raise ValueError("pr.nc: bad units 'K'")
    text = log_path.read_text()
    assert "ERROR" in text and "stage broken failed after" in text and "ValueError: pr.nc: bad units 'K'" in text
    assert "Traceback" not in text  # input errors are one readable line, not a stack dump
    logging.getLogger().handlers.clear()
