import numpy as np

from patchcore_milvus.regions import Region, defect_regions


def test_each_connected_part_of_the_mask_is_one_region_largest_first():
    mask = np.zeros((40, 60), dtype=bool)
    mask[5:10, 5:8] = True  # 15 pixels
    mask[20:30, 30:40] = True  # 100 pixels
    mask[30, 40] = True  # touches the square at a corner: the same region (8-connected)
    amap = np.zeros(mask.shape)
    amap[7, 6], amap[25, 35] = 3.0, 9.5
    assert defect_regions(mask, amap) == [
        Region(box=(30, 20, 41, 31), area=101, peak=9.5),
        Region(box=(5, 5, 8, 10), area=15, peak=3.0),
    ]


def test_no_mask_or_an_empty_one_has_no_regions():
    amap = np.ones((8, 8))
    assert defect_regions(None, amap) == [] and defect_regions(np.zeros((8, 8), dtype=bool), amap) == []
