#!/usr/bin/env bash
# Prints the golden etcd messages of src/bench.rs's codec test as Rust
# constants: each is protoc's encoding (Debian's protobuf-compiler) of a text-
# format message, with etcd's own field definitions (scripts/etcd-proto, copied
# from etcd's api/etcdserverpb/rpc.proto and api/mvccpb/kv.proto). The test
# holds the output, so it needs no protoc; rerun this only to add cases.
set -euo pipefail
cd "$(dirname "$0")/etcd-proto"
command -v protoc >/dev/null || { echo "needs protoc: apt-get install -y protobuf-compiler" >&2; exit 1; }

HEADER='header { cluster_id: 14841639068965178418 member_id: 10276657743932975437 revision: 42 raft_term: 3 }'
KV_42='kvs { key: "key-42" create_revision: 5 mod_revision: 42 version: 7 value: "hello" lease: 7587868562287261001 }'
KV_43='kvs { key: "key-43" create_revision: 6 mod_revision: 6 version: 1 value: "" }'
VALUE_130=$(printf 'v%.0s' $(seq 130))

# golden NAME MESSAGE TEXT [TEXT-AS-SHOWN]
golden() {
    local name=$1 message=$2 text=$3 shown=${4:-$3}
    printf '/// `%s { %s }`\nconst %s: &str = "%s";\n' "$message" "$shown" "$name" \
        "$(protoc -I. --encode="etcdserverpb.$message" rpc.proto <<<"$text" | xxd -p | tr -d '\n')"
}

golden PUT_REQUEST PutRequest "key: \"key-42\" value: \"$VALUE_130\"" 'key: "key-42" value: "v" * 130'
golden PUT_REQUEST_EMPTY_VALUE PutRequest 'key: "key-42"'
golden RANGE_REQUEST RangeRequest 'key: "key-42"'
golden RANGE_RESPONSE_ONE RangeResponse "$HEADER $KV_42 count: 1"
golden RANGE_RESPONSE_MANY RangeResponse "$HEADER $KV_42 $KV_43 more: true count: 300"
golden RANGE_RESPONSE_NONE RangeResponse "$HEADER"
