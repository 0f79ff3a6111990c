"""ADE20K semantic segmentation: UperNet on a ``repro`` ViT export with mmsegmentation (see ``__main__``)."""
