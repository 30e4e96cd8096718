/* Family registry: checkpoints whose tower and connector run as one model (internal.h). */
#include "models/models.h"

static const mmb_family_ops *const all[] = {&mmb__family_blip2, &mmb__family_qwen2vl, &mmb__family_idefics2,
                                            &mmb__family_idefics3, &mmb__family_smolvlm, &mmb__family_idefics, NULL};

const mmb_family_ops *mmb__family_find(const mmb_ckpt *c, const char *arch, const char *model_type) {
    for (int i = 0; all[i]; i++)
        if (all[i]->detect(c, arch, model_type)) return all[i];
    return NULL;
}
