"""The label fields of a record, an example and a batch, named once.

Every record carries the labels of every task with a validity mask per task (a frame of the VA
records has `expr_mask` False, ...). Batches add the model's named inputs ("image", "features"),
`index` (the record index, -1 for padding) and, for evaluation and clips, `mask`.
"""

HEADS = ("va", "expr", "au")
MASKS = tuple(f"{h}_mask" for h in HEADS)
LABEL_KEYS = (*HEADS, *MASKS)
