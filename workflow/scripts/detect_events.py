"""Snakemake script of rule detect_events: see precip_cvae.events."""

from precip_cvae import events
from precip_cvae.config import EventsConfig
from precip_cvae.logs import stage_logging
from precip_cvae.resources import limit_threads

with stage_logging(snakemake.log[0], "detect_events"), limit_threads(snakemake.threads):
    events.run(
        snakemake.input.dataset,
        EventsConfig.from_dict(snakemake.params.events),
        thresholds_out=snakemake.output.thresholds,
        events_out=snakemake.output.events,
    )
