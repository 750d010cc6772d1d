"""Data: COCO-format datasets (coco.py), the rules a dataset must follow (rules.py: one function per kind of
record, applied by the dataset and by the checker), the synthetic shapes generator (shapes.py), dataset checking
(check.py), converters from other formats (convert.py, from_masks.py), the COCO subset tool (subset.py),
augmentation (transforms.py), loaders and samplers (loader.py, samplers.py), and the datasets of a config
(build.py). Import from the modules themselves.
"""
