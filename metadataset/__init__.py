"""Meta-Dataset's few-shot protocol (Triantafillou et al., ICLR 2020) on frozen backbone features."""
