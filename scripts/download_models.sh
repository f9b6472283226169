#!/bin/bash
# upstream's pretrained latent diffusion models, each into models/ldm/<name>/ (model.ckpt, config.yaml)
source "$(dirname "$0")/download_lib.sh"
fetch models/ldm/celeba256 https://ommer-lab.com/files/latent-diffusion/celeba.zip
fetch models/ldm/ffhq256 https://ommer-lab.com/files/latent-diffusion/ffhq.zip
fetch models/ldm/lsun_churches256 https://ommer-lab.com/files/latent-diffusion/lsun_churches.zip
fetch models/ldm/lsun_beds256 https://ommer-lab.com/files/latent-diffusion/lsun_bedrooms.zip
fetch models/ldm/text2img256 https://ommer-lab.com/files/latent-diffusion/text2img.zip
fetch models/ldm/cin256 https://ommer-lab.com/files/latent-diffusion/cin.zip
fetch models/ldm/semantic_synthesis512 https://ommer-lab.com/files/latent-diffusion/semantic_synthesis.zip
fetch models/ldm/semantic_synthesis256 https://ommer-lab.com/files/latent-diffusion/semantic_synthesis256.zip
fetch models/ldm/bsr_sr https://ommer-lab.com/files/latent-diffusion/sr_bsr.zip
fetch models/ldm/layout2img-openimages256 https://ommer-lab.com/files/latent-diffusion/layout2img_model.zip
fetch models/ldm/inpainting_big https://ommer-lab.com/files/latent-diffusion/inpainting_big.zip
report
