"""Figures the thesis reports, kept apart from anything this project measures.

Source: F. Torres Figueroa, "Learning discriminative representations to interpret image recognition
models", PhD thesis, Aix-Marseille Université, 2024, ch. 3 (ImageNet-1k). They are shown beside our
own measurements and used as the reference the tests check against; they are never reported as ours.
Parameter counts are in millions, as printed (last digit rounded or truncated).
"""

# Table 3.3: GAP baseline vs CA-Stream (S0-S4, vanilla CA block).
TABLE_3_3 = {
    "resnet18_castream": dict(gap_params_m=11.69, params_m=12.13, stream_params_m=0.44,
                              gap_gflops=3.648, gflops=3.652, gap_top1=67.28, top1=67.54),
    "resnet50_castream": dict(gap_params_m=25.56, params_m=32.53, stream_params_m=6.96,
                              gap_gflops=8.268, gflops=8.288, gap_top1=74.55, top1=74.70),
    "convnext_small_castream": dict(gap_params_m=50.22, params_m=51.20, stream_params_m=0.98,
                                    gap_gflops=17.395, gflops=17.400, gap_top1=83.26, top1=83.14),
    "convnext_base_castream": dict(gap_params_m=88.59, params_m=90.33, stream_params_m=1.74,
                                   gap_gflops=30.747, gflops=30.753, gap_top1=83.72, top1=83.51),
}

# Table 3.4: ResNet-50 stream parameters by cross-attention block design.
TABLE_3_4_STREAM_PARAMS_M = {"ca": 6.96, "proj_ca": 18.13}

# Table 3.5: ResNet-50 stream parameters by placement S_l - S_4, keyed by the first stage l.
TABLE_3_5_STREAM_PARAMS_M = {0: 6.96, 1: 6.95, 2: 6.82, 3: 6.29, 4: 4.20}

# Table 3.6: ResNet-50 total parameters, class-agnostic vs class-specific query.
TABLE_3_6_PARAMS_M = {"class_agnostic": 32.53, "class_specific": 32.59}
