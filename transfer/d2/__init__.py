"""Detectron2 glue: detection, instance segmentation and keypoint transfer from a backbone card.

``compat`` is the only module that imports Detectron2 (it applies the stand-ins needed on
machines without its compiled ops); ``install`` puts the pinned Detectron2 v0.6 Python tree in
place; ``convert`` maps torchvision ResNet keys to Detectron2's; ``synthetic_coco`` writes the
embedded COCO-format dataset; ``data`` registers datasets; ``train`` trains and evaluates;
``tasks`` registers the tasks.
"""
