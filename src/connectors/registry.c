/* Connector registry: checkpoint type name -> ops. */
#include "connectors/connectors.h"

static const mmb_connector_ops *const all[] = {&mmb__conn_identity, &mmb__conn_mlp, &mmb__conn_resmlp,
                                               &mmb__conn_dense,
                                               &mmb__conn_cabs, &mmb__conn_ldp, &mmb__conn_moe, &mmb__conn_lowrank,
                                               &mmb__conn_flamingo_perceiver};
#define N_CONN ((int)(sizeof all / sizeof all[0]))

/* Registered names (mlp covers "linear", "mlpNx_gelu" for any N >= 1, and "llava"; the Dense
 * Connector's are followed by one of the others). */
static const char *const names[] = {"identity", "linear", "mlpNx_gelu", "llava", "simple_res",
                                    "dense_sti", "dense_sci", "dense_dci",
                                    "c-abs", "ldpnet", "ldpnetv2", "moe_mlpNx_gelu", "lowrank", "lowrank_mlp2x_gelu",
                                    "flamingo_perceiver"};

const mmb_connector_ops *mmb__connector_find(const char *type) {
    for (int i = 0; i < N_CONN; i++)
        if (all[i]->accepts(type)) return all[i];
    return NULL;
}

int mmb_connector_names(const char *const **out) {
    if (out) *out = names;
    return (int)(sizeof names / sizeof names[0]);
}
