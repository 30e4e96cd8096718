/* mmbridge train: stage-1 training of a LLaVA projector through the frozen tower and LLM (mmb_train), with a
 * progress line per step; Ctrl-C stops after the step in progress, with a checkpoint to --resume from. */
#include "cli.h"

#include <signal.h>
#include <stdio.h>
#include <string.h>

static volatile sig_atomic_t interrupted;

static void on_sigint(int sig) {
    (void)sig;
    interrupted = 1;
}

static void hms(char *b, size_t n, double s) {
    long t = s > 0 && s < 1e9 ? (long)(s + 0.5) : 0;
    snprintf(b, n, "%ld:%02ld:%02ld", t / 3600, t / 60 % 60, t % 60);
}

static int on_step(void *user, int64_t step, int64_t steps, double loss, double lr, double tps, double eta) {
    const int64_t stop_after = *(const int64_t *)user;
    char e[32], bar[31];
    hms(e, sizeof e, eta);
    int fill = steps ? (int)(30 * step / steps) : 30;
    for (int i = 0; i < 30; i++) bar[i] = i < fill ? '=' : i == fill ? '>' : ' ';
    bar[30] = 0;
    fprintf(stderr, "\rstep %lld/%lld [%s] loss %.4f lr %.3g %.0f tok/s ETA %s ", (long long)step, (long long)steps,
            bar, loss, lr, tps, e);
    if (step == steps) fputc('\n', stderr);
    return interrupted || (stop_after && step >= stop_after);
}

static void on_cache(void *user, int64_t done, int64_t total) {
    (void)user;
    fprintf(stderr, "\rcaching features: sample %lld of %lld ", (long long)done, (long long)total);
}

int cmd_train(int argc, char **argv) {
    const char *pos[1];
    cli_ctx_opts co = {0};
    mmb_train_params p = mmb_train_default_params();
    int64_t batch = p.batch, micro = p.micro_batch, epochs = 1, max_steps = 0, save = p.save_every, seed = 0,
            stop_after = 0;
    double warm = p.warmup_ratio;
    const cli_opt opts[] = {
        {.name = "--data", .meta = "JSON", .type = CLI_STR, .dst = &p.data,
         .help = "LLaVA's pretraining data: [{\"image\": path, \"conversations\": [...]}, ...]"},
        {.name = "--image-dir", .meta = "DIR", .type = CLI_STR, .dst = &p.image_dir,
         .help = "the images' directory (LLaVA's --image_folder; default: the JSON's)"},
        {.name = "-o", .meta = "DIR", .type = CLI_STR, .dst = &p.out, .help = "the output directory"},
        {.name = "--cache", .meta = "DIR", .type = CLI_STR, .dst = &p.cache_dir,
         .help = "the feature cache (default: OUT/features); reused by later runs"},
        {.name = "--vision-tower", .meta = "DIR", .type = CLI_STR, .dst = &p.vision_tower,
         .help = "the CLIP/SigLIP directory of an original-layout LLaVA checkpoint"},
        {.name = "--lr", .meta = "R", .type = CLI_NUM, .dst = &p.lr, .help = "peak learning rate (default 1e-3)",
         .lo = 1e-12, .hi = 10},
        {.name = "--weight-decay", .meta = "W", .type = CLI_NUM, .dst = &p.weight_decay,
         .help = "AdamW's decoupled weight decay (default 0)", .lo = 0, .hi = 10},
        {.name = "--warmup-ratio", .meta = "F", .type = CLI_NUM, .dst = &warm,
         .help = "linear warm-up over this share of the steps, then cosine (default 0.03)", .lo = 0, .hi = 1},
        {.name = "--max-grad-norm", .meta = "N", .type = CLI_NUM, .dst = &p.max_grad_norm,
         .help = "clip the gradient's global norm (default 1)", .lo = 1e-12, .hi = 1e12},
        {.name = "--batch", .meta = "N", .type = CLI_INT, .dst = &batch,
         .help = "samples per optimizer step (default 256)", .lo = 1, .hi = 1 << 24},
        {.name = "--micro-batch", .meta = "N", .type = CLI_INT, .dst = &micro,
         .help = "samples per micro-batch (default 16; divides --batch): the loss is each\n"
         "micro-batch's token mean, a step's gradient their mean", .lo = 1, .hi = 1 << 24},
        {.name = "--epochs", .meta = "N", .type = CLI_INT, .dst = &epochs, .help = "passes over the data (default 1)",
         .lo = 1, .hi = 1 << 20},
        {.name = "--max-steps", .meta = "N", .type = CLI_INT, .dst = &max_steps,
         .help = "stop after N steps (the schedule spans them)", .lo = 0, .hi = 1ll << 40},
        {.name = "--save-every", .meta = "N", .type = CLI_INT, .dst = &save,
         .help = "steps between checkpoints (default 50)", .lo = 1, .hi = 1ll << 40},
        {.name = "--random-init", .meta = NULL, .type = CLI_FLAG, .dst = &p.random_init,
         .help = "start the projector from nn.Linear's default init (--seed), not the checkpoint's"},
        {.name = "--seed", .meta = "S", .type = CLI_INT, .dst = &seed, .help = "--random-init's seed", .lo = 0,
         .hi = 1ll << 62},
        {.name = "--stop-after", .meta = "N", .type = CLI_INT, .dst = &stop_after,
         .help = "pause after step N with a checkpoint (as Ctrl-C does; --resume goes on)", .lo = 0,
         .hi = 1ll << 40},
        {.name = "--resume", .meta = NULL, .type = CLI_FLAG, .dst = &p.resume,
         .help = "continue from OUT/checkpoint.safetensors"},
        {.name = "--skip-bad", .meta = NULL, .type = CLI_FLAG, .dst = &p.skip_bad,
         .help = "skip (and count) unreadable images and samples longer than the context"},
        CLI_OPT_THREADS(&co.threads),
    };
    const cli_spec spec = {"train", "MODEL --data JSON -o DIR",
        "Trains MODEL's projector (LLaVA stage 1) through its frozen tower and LLM on LLaVA's\n"
        "pretraining data: the caption's next-token loss, AdamW with warm-up and cosine decay, the\n"
        "gradient clipped. The tower runs once per image (the cache); OUT gets mm_projector.safetensors\n"
        "(LLaVA's --pretrain_mm_mlp_adapter layout), hf/ (a transformers checkpoint with the trained\n"
        "projector, for a transformers MODEL), checkpoint.safetensors (the resume point), loss.csv and\n"
        "loss.png. Ctrl-C stops after the current step, with a checkpoint.\n",
        opts, CLI_N(opts), pos, 1, 1, NULL};
    int r = cli_parse(&spec, argc, argv);
    if (r) return r == 1 ? 0 : r;
    if (!p.data || !p.out) {
        fprintf(stderr, "mmbridge train: --data and -o are needed\n");
        return 2;
    }
    p.model = pos[0];
    p.batch = batch;
    p.micro_batch = micro;
    p.epochs = epochs;
    p.max_steps = max_steps;
    p.save_every = save;
    p.seed = (uint64_t)seed;
    p.warmup_ratio = warm > 0 ? warm : -1; /* 0 asked: no warm-up */
    p.on_step = on_step;
    p.on_cache = on_cache;
    p.user = &stop_after;
    mmb_ctx *ctx = cli_ctx(&co);
    if (!ctx) return 1;
    struct sigaction sa = {0}, old;
    sa.sa_handler = on_sigint;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, &old);
    mmb_train_result res = {0};
    mmb_status s = mmb_train(ctx, &p, &res);
    sigaction(SIGINT, &old, NULL);
    if (s == MMB_OK || s == MMB_ERR_ABORTED) {
        fprintf(stderr, "%s%lld steps, last loss %.4f, %lld samples (%lld skipped), %lld images cached now, %.1f s%s\n",
                s == MMB_ERR_ABORTED ? "\nstopped: " : "", (long long)res.steps, res.last_loss,
                (long long)res.samples, (long long)res.skipped, (long long)res.cached, res.seconds,
                s == MMB_ERR_ABORTED ? " (resume with --resume)" : "");
        r = s == MMB_OK ? 0 : 130;
    } else
        r = cli_fail(ctx, NULL);
    mmb_ctx_free(ctx);
    return r;
}
