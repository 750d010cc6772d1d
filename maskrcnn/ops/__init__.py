from .roi_align import roi_align, RoIAlign
