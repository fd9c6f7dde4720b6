from fhir_service.cli import main

main()
