// Types litegraph declares but does not re-export from its package root.
export type { IBaseWidget } from "@comfyorg/litegraph/dist/types/widgets";
export type { ISerialisedNode, ISerialisedGraph } from "@comfyorg/litegraph/dist/types/serialisation";
