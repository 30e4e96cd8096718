/* Connector registry: the one list of the connectors a LLaVA-path checkpoint names (mm_projector_type,
 * ...), each described by its own ops table (names, activation, synthetic config). Adding a connector is
 * its file plus one X(...) line below; nothing else lists connectors. */
#include "connectors/connectors.h"

#include <pthread.h>
#include <string.h>

/* X(n): the ops table mmb__conn_<n>, defined in that connector's file; the first is "identity". Names
 * are searched in this order. */
#define CONNECTORS(X) \
    X(identity) \
    X(mlp) \
    X(resmlp) \
    X(dense) \
    X(cabs) \
    X(ldp) \
    X(moe) \
    X(lowrank) \
    X(flamingo_perceiver) \
    /* the end of the list: one line "X(name) \" per connector above */

#define DECLARE(n) extern const mmb_connector_ops mmb__conn_##n;
CONNECTORS(DECLARE)
#define ENTRY(n) &mmb__conn_##n,
static const mmb_connector_ops *const all[] = {CONNECTORS(ENTRY)};
#define N_CONN ((int)(sizeof all / sizeof all[0]))

/* Is `type` one of ops' names? */
static bool has_name(const mmb_connector_ops *ops, const char *type) {
    for (const char *const *n = ops->names; n && *n; n++)
        if (strcmp(*n, type) == 0) return true;
    return false;
}

const char *mmb__connector_activation(const mmb_connector_ops *ops, const void *state) {
    return ops->activation ? ops->activation(state) : "";
}

const mmb_connector_ops *mmb__connector_find(const char *type) {
    for (int i = 0; i < N_CONN; i++)
        if (all[i]->accepts ? all[i]->accepts(type) : has_name(all[i], type)) return all[i];
    return NULL;
}

/* Every registered name, in registry order, built once from the ops tables (constant afterwards). */
#define MAX_NAMES 64
static const char *names[MAX_NAMES];
static int n_names;
static pthread_once_t names_once = PTHREAD_ONCE_INIT;

static void collect_names(void) {
    for (int i = 0; i < N_CONN; i++)
        for (const char *const *n = all[i]->names; *n && n_names < MAX_NAMES; n++) names[n_names++] = *n;
}

int mmb_connector_names(const char *const **out) {
    pthread_once(&names_once, collect_names);
    if (out) *out = names;
    return n_names;
}
