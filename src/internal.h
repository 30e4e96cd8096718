/* The umbrella over the library's layers, for the pipeline layer on top (src/pipeline/) and the C unit
 * tests. Every other file includes its own layer's header, which includes the layers below it:
 *   base/base.h < tensor/tensor.h < io/io.h < vision/vision.h, text/text.h < connectors/connectors.h
 *   < models/models.h < lm/lm.h
 * tools/check_layers.py fails CI when a file includes a header of a layer above its own. */
#ifndef MMB_INTERNAL_H
#define MMB_INTERNAL_H

#include "lm/lm.h"
#include "text/text.h"

#endif
