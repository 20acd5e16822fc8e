"""Statistics the methods decompose from: activation Grams (and their whitening), gradient Fisher, paired streams
for the correction, residual-stream similarity across blocks."""
from .activations import (ModuleStats, StatsCollector, Whitening, batch_mask, collect_stats, positive_floor,
                          stats_from_tensors, stats_tensors, whiten)
from .fisher import (FisherStats, Frozen, add_row_fisher, collect_fisher, collect_output_fisher, is_contrastive,
                     lm_labels, output_fisher_hooks, pooled_views, sensitivity_loss, sensitivity_samples, with_fisher,
                     zeros_for_missing)
from .paired import PairedStats, grams
from .similarity import block_similarity

__all__ = ["FisherStats", "Frozen", "add_row_fisher", "output_fisher_hooks", "zeros_for_missing", "ModuleStats", "PairedStats", "StatsCollector", "Whitening", "batch_mask",
           "block_similarity", "collect_fisher", "collect_output_fisher", "collect_stats", "grams", "is_contrastive", "lm_labels",
           "pooled_views", "positive_floor", "sensitivity_loss", "sensitivity_samples", "stats_from_tensors", "stats_tensors", "whiten", "with_fisher"]
