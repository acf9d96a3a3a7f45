"""Figures the thesis reports, kept apart from anything this project measures.

Source: F. Torres Figueroa, "Learning discriminative representations to interpret image recognition
models", PhD thesis, Aix-Marseille Université, 2024, ch. 3 (CA-Stream) and ch. 4 (gradient denoising). They
are shown beside our own measurements (model cards, the quick look) and used as the reference the tests check
against; they are never reported as ours. Parameter counts are in millions, as printed (last digit rounded or
truncated); every other figure is as printed too.
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

# Interpretability tables. Methods by evaluation.saliency's names, metrics by the harness' (results.json):
# AD, AG, AI, insertion I and deletion D, all in percent; recognition as top1 (accuracy) or mAP.

# Table 3.1: ImageNet-1k validation set, post-hoc CAM methods on the GAP baseline ("gap") and on CA-Stream ("ca").
TABLE_3_1 = {
    "resnet18_castream": {
        "gap": {"gradcam": dict(AD=17.64, AG=12.73, AI=41.21, I=63.13, D=10.66),
                "gradcampp": dict(AD=19.05, AG=11.16, AI=37.99, I=62.80, D=10.75),
                "scorecam": dict(AD=13.64, AG=12.98, AI=44.53, I=62.56, D=11.37)},
        "ca": {"gradcam": dict(AD=16.99, AG=17.22, AI=44.95, I=65.94, D=10.68),
               "gradcampp": dict(AD=19.02, AG=14.76, AI=40.82, I=65.53, D=10.82),
               "scorecam": dict(AD=11.53, AG=18.12, AI=50.32, I=65.33, D=11.51)},
    },
    "resnet50_castream": {
        "gap": {"gradcam": dict(AD=13.04, AG=17.56, AI=44.47, I=72.57, D=13.24),
                "gradcampp": dict(AD=13.79, AG=15.87, AI=42.08, I=72.32, D=13.33),
                "scorecam": dict(AD=8.83, AG=17.97, AI=48.46, I=71.99, D=14.31)},
        "ca": {"gradcam": dict(AD=12.54, AG=22.67, AI=48.56, I=75.53, D=13.50),
               "gradcampp": dict(AD=13.99, AG=19.29, AI=44.60, I=75.21, D=13.78),
               "scorecam": dict(AD=7.09, AG=23.65, AI=54.20, I=74.91, D=14.68)},
    },
    "convnext_small_castream": {
        "gap": {"gradcam": dict(AD=42.99, AG=1.69, AI=12.60, I=48.42, D=30.12),
                "gradcampp": dict(AD=56.42, AG=1.32, AI=10.35, I=48.28, D=33.41),
                "scorecam": dict(AD=74.79, AG=1.29, AI=10.10, I=47.40, D=38.21)},
        "ca": {"gradcam": dict(AD=22.09, AG=14.91, AI=32.65, I=84.82, D=43.02),
               "gradcampp": dict(AD=51.87, AG=9.40, AI=20.55, I=84.28, D=52.58),
               "scorecam": dict(AD=64.21, AG=8.81, AI=18.96, I=82.92, D=57.46)},
    },
    "convnext_base_castream": {
        "gap": {"gradcam": dict(AD=33.72, AG=2.43, AI=15.25, I=52.85, D=29.57),
                "gradcampp": dict(AD=34.01, AG=2.37, AI=15.60, I=52.83, D=29.17),
                "scorecam": dict(AD=43.55, AG=2.23, AI=15.67, I=50.96, D=39.49)},
        "ca": {"gradcam": dict(AD=19.45, AG=13.96, AI=32.89, I=86.38, D=45.29),
               "gradcampp": dict(AD=36.69, AG=8.00, AI=21.95, I=85.39, D=53.42),
               "scorecam": dict(AD=23.51, AG=11.04, AI=27.35, I=83.41, D=60.53)},
    },
}

# Table 3.2: ResNet-50 fine-tuned on CUB-200-2011 (accuracy) and Pascal VOC 2012 (mAP), GAP baseline vs CA-Stream.
TABLE_3_2 = {
    "cub": {
        "gap": dict(top1=76.96, methods={"gradcam": dict(AD=10.87, AG=10.29, AI=45.81, I=65.71, D=6.17),
                                         "gradcampp": dict(AD=11.35, AG=9.68, AI=44.32, I=65.64, D=5.92),
                                         "scorecam": dict(AD=9.05, AG=10.62, AI=48.90, I=65.58, D=5.94)}),
        "ca": dict(top1=75.90, methods={"gradcam": dict(AD=10.44, AG=17.61, AI=53.54, I=74.60, D=6.56),
                                        "gradcampp": dict(AD=11.01, AG=16.50, AI=51.63, I=74.64, D=6.21),
                                        "scorecam": dict(AD=6.37, AG=19.50, AI=60.41, I=74.22, D=2.14)}),
    },
    "voc": {
        "gap": dict(mAP=78.32, methods={"gradcam": dict(AD=12.61, AG=9.68, AI=27.88, I=89.10, D=59.39),
                                        "gradcampp": dict(AD=12.25, AG=9.68, AI=27.62, I=89.34, D=54.23),
                                        "scorecam": dict(AD=14.8, AG=6.76, AI=36.41, I=71.10, D=39.95)}),
        "ca": dict(mAP=78.35, methods={"gradcam": dict(AD=12.77, AG=15.46, AI=34.53, I=88.53, D=59.16),
                                       "gradcampp": dict(AD=12.28, AG=16.76, AI=34.87, I=89.02, D=53.34),
                                       "scorecam": dict(AD=10.96, AG=21.35, AI=43.82, I=89.21, D=51.44)}),
    },
}

# Table 4.1: CIFAR-100, the baseline ("baseline") vs gradient denoising with the cosine error ("cosine", weight λ).
TABLE_4_1 = {
    "resnet18_cifar": {
        "baseline": dict(top1=73.42, methods={"gradcam": dict(AD=30.16, AG=15.23, AI=29.99, I=58.47, D=17.47),
                                              "gradcampp": dict(AD=31.40, AG=14.17, AI=28.47, I=58.61, D=17.05),
                                              "scorecam": dict(AD=26.49, AG=18.62, AI=33.84, I=58.42, D=18.31),
                                              "ablationcam": dict(AD=31.96, AG=14.02, AI=28.33, I=58.36, D=17.14),
                                              "axiomcam": dict(AD=30.16, AG=15.23, AI=29.98, I=58.47, D=17.47)}),
        "cosine": dict(weight=7.5e-3, top1=72.86,
                       methods={"gradcam": dict(AD=28.09, AG=16.19, AI=31.53, I=58.76, D=17.57),
                                "gradcampp": dict(AD=29.78, AG=15.07, AI=29.60, I=58.90, D=17.22),
                                "scorecam": dict(AD=24.82, AG=19.49, AI=35.51, I=59.11, D=18.34),
                                "ablationcam": dict(AD=29.90, AG=15.03, AI=29.61, I=58.70, D=17.37),
                                "axiomcam": dict(AD=28.09, AG=16.20, AI=31.53, I=58.76, D=17.57)}),
    },
    "mobilenetv2_cifar": {
        "baseline": dict(top1=59.43, methods={"gradcam": dict(AD=44.64, AG=6.57, AI=25.62, I=44.64, D=14.34),
                                              "gradcampp": dict(AD=45.98, AG=6.12, AI=24.10, I=44.72, D=14.76),
                                              "scorecam": dict(AD=40.55, AG=7.85, AI=28.57, I=45.62, D=14.52),
                                              "ablationcam": dict(AD=45.15, AG=6.38, AI=25.32, I=44.62, D=15.03),
                                              "axiomcam": dict(AD=44.65, AG=6.57, AI=25.62, I=44.64, D=15.27)}),
        "cosine": dict(weight=1e-3, top1=62.36,
                       methods={"gradcam": dict(AD=40.89, AG=7.31, AI=27.08, I=45.57, D=15.20),
                                "gradcampp": dict(AD=40.76, AG=6.85, AI=26.46, I=45.51, D=14.92),
                                "scorecam": dict(AD=36.34, AG=9.09, AI=30.50, I=46.35, D=14.72),
                                "ablationcam": dict(AD=41.13, AG=7.03, AI=26.10, I=45.38, D=15.12),
                                "axiomcam": dict(AD=40.89, AG=7.31, AI=27.08, I=45.57, D=15.20)}),
    },
}
