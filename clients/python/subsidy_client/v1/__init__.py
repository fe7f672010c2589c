"""Generated from protos/subsidy/v1 by scripts/gen_protos.py. Do not edit."""

from subsidy_client.v1 import authorization_pb2 as authorization_pb2
from subsidy_client.v1 import authorization_pb2_grpc as authorization_pb2_grpc
from subsidy_client.v1 import campaign_pb2 as campaign_pb2
from subsidy_client.v1 import campaign_pb2_grpc as campaign_pb2_grpc
from subsidy_client.v1 import catalog_pb2 as catalog_pb2
from subsidy_client.v1 import catalog_pb2_grpc as catalog_pb2_grpc
from subsidy_client.v1 import common_pb2 as common_pb2
from subsidy_client.v1 import common_pb2_grpc as common_pb2_grpc
from subsidy_client.v1 import complaints_pb2 as complaints_pb2
from subsidy_client.v1 import complaints_pb2_grpc as complaints_pb2_grpc
from subsidy_client.v1 import daily_report_pb2 as daily_report_pb2
from subsidy_client.v1 import daily_report_pb2_grpc as daily_report_pb2_grpc
from subsidy_client.v1 import diagnostics_pb2 as diagnostics_pb2
from subsidy_client.v1 import diagnostics_pb2_grpc as diagnostics_pb2_grpc
from subsidy_client.v1 import exchange_pb2 as exchange_pb2
from subsidy_client.v1 import exchange_pb2_grpc as exchange_pb2_grpc
from subsidy_client.v1 import merchant_pb2 as merchant_pb2
from subsidy_client.v1 import merchant_pb2_grpc as merchant_pb2_grpc
from subsidy_client.v1 import qualification_pb2 as qualification_pb2
from subsidy_client.v1 import qualification_pb2_grpc as qualification_pb2_grpc
from subsidy_client.v1 import reconciliation_pb2 as reconciliation_pb2
from subsidy_client.v1 import reconciliation_pb2_grpc as reconciliation_pb2_grpc
from subsidy_client.v1 import reporting_pb2 as reporting_pb2
from subsidy_client.v1 import reporting_pb2_grpc as reporting_pb2_grpc
from subsidy_client.v1 import supervision_pb2 as supervision_pb2
from subsidy_client.v1 import supervision_pb2_grpc as supervision_pb2_grpc
